"""What a job produced, for people and scripts: status, exports, the provenance index and the HTML report."""
