"""appctrl."""
