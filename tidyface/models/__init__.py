"""One file per architecture family; each registers its variants when imported."""
