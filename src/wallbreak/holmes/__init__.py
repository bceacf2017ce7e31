"""Holmes: train one model across clusters whose NICs differ. Only the cluster spec exists so far."""
