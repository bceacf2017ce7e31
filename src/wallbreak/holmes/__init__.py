"""Holmes: train one model across clusters whose NICs differ: plan/, runtime/, emulate/."""
