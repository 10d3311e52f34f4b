"""Captioning beyond one process: the Ray Data engine (`ray_engine`), its sources (`sources`: folders,
webdataset shards, parquet, Hugging Face datasets), caption shards (`shards`), and `loracap export`
(`export`: shards -> trainer files). Needs the `ray` extra; `import loracap.scale` itself is light."""
