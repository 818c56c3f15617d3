"""Cloud sync: the protocol client and the SyncManager."""
