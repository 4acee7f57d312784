"""Domain R: the keeper process that hosts the remote-management servers and backends."""
