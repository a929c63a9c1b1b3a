"""The artifact directory contract: the manifest and its schema, verified and confined file reads,
atomic writes, the checks made when graphs and tables are loaded, and the weights' memory."""
