"""Weight clustering: non-uniform codebooks (look-up tables) fitted by weighted k-means."""
