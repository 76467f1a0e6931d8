"""HTTP routes only: each handler validates through the protocol models and calls the serving layer."""
