"""The Evolink API as batchgen speaks it: the HTTP client and the mapping of answers to our errors."""
