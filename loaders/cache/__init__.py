"""What onlinemix derives from data and keeps: where (``folder``), the token cache (``tokens``: a document
domain tokenized once, its format and its builder), and the cache as a whole (``entries``: list, prune, clear,
``$ONLINEMIX_CACHE_LIMIT``)."""
