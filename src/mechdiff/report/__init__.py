"""The HTML report and the figures the stages draw."""
