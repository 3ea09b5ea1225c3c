package saga

// SetRelayLimits shrinks a relay's batch and its cap of records in flight
// per partition, so tests reach them with a few rows.
func SetRelayLimits(r *Relay, batch, perPartition int) { r.batch, r.perPart = batch, perPartition }
