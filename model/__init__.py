"""The math of shardserve: model definitions, sharded layers, paged attention and weight loading."""
