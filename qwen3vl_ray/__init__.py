"""qwen3vl-ray core library: tiered tensor store, codecs and the Qwen3-VL engine. No Ray import here."""
