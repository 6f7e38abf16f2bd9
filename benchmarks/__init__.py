"""Benchmarks of gradclip_algo against torch.nn.utils, Composer and timm (``make bench``)."""
