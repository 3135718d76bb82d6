"""The networks: the LARP tokenizer (with its quantizer, prior, discriminator and losses) and the NAR / raster
generators with their decoding orders and KV-cache decode loop."""
