"""onlinemix.mixing: deciding the mixture weights. Nothing here knows about files or workers."""
