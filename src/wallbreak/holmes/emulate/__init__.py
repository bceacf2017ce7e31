"""A heterogeneous cluster on one machine: namespaces, shaped links, and the trainer run on them."""
