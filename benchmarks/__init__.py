"""Performance and quality measurements (`make bench`). Tests never assert timings; these scripts report them."""
