"""Remote shards: the stores (S3, HTTP, pipe:) and the local cache of fetched shards."""
