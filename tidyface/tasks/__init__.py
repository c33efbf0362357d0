"""Workflows that compose models: detect, align/crop, embed, dedup, group, video2faces."""
