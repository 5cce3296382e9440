"""Analysis on the store: alignment, NAPs and contrasts, stacking, projections."""
