"""How `data convert` lays out Parquet shards: records per shard and per row group.

It imports nothing, so that `llavactl --help` shows the default without loading the converter.
"""

DEFAULT_SHARD_RECORDS = 10_000
# Rows per row group: a record read decodes its whole group, embedded images included.
ROW_GROUP_RECORDS = 64
