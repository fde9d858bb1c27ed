"""Array-level mechanisms that know no model module: attention masks (`masks`), the attention
backends (`backends`), the layer-period scan and remat policies (`scan`), the dropout key (`rng`)."""
