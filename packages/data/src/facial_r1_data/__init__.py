"""Facial-R1 data: everything that turns images and labels into unified JSONL."""
