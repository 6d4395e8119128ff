"""Taking a checkpoint apart: the extraction plan, streaming the source shards once, writing per-expert and
backbone files, the manifest, verifying an extraction, and the availability of experts in it."""
