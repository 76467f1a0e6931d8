"""The shadow path: sampling, the bounded job queue and its workers, the load watch, and what the
scores feed (quality statistics, the KLD history, the drift detector, the guard, kept scores).
The scorers themselves live in kvproxy.scoring."""
