"""What is checked before a run starts: its options (`options`) and whether it fits in memory (`memory`)."""
