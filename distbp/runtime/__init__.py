"""The Ray side: starting or joining Ray, the shard workers and parameter actors, the step
engines and their links, the messages between them, and recovery from failures."""
