"""Deployments: a model name clients send, its primary, its reference and its shadow path.

``base`` (what every kind shares), ``embedded`` and ``http`` (the two kinds), ``status`` (the status
route's view of one), ``spec`` (the deployments file), ``build`` (settings and file -> deployments).
"""
