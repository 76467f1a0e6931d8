"""The shadow path: sampling, the bounded job queue and its workers, the scorers, and what the
scores feed (quality statistics, the KLD history, the drift detector, the guard, kept scores)."""
