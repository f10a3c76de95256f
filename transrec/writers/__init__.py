"""Writers of dataset directories (the format: dataloading/dataset_format.py); the readers never import them.

- `dataset_writer`: `DatasetWriter` (items, sequences, manifest; atomic) and `SequenceWriter` (one part).
- `movielens`: RecBole atomic files -> a data set (`transrec prepare movielens`).
- `synthetic`: a generated mixture-of-modalities data set (`transrec prepare synthetic`, the demo).
- `posters`, `clips`: the SYNTHETIC poster images and clips (VP9 in WebM) of both.
"""
