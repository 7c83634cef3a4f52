"""The worker: claims ready futures from the store, plans jobs, runs them on the engine."""
