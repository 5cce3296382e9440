"""Pictures: plots and the HTML report."""
