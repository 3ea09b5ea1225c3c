package loadgen

import (
	"math"
	"slices"
	"time"
)

// Summary is a latency distribution: exact percentiles over every sample.
type Summary struct {
	Count int           `json:"count"`
	P50   time.Duration `json:"p50_ns"`
	P90   time.Duration `json:"p90_ns"`
	P99   time.Duration `json:"p99_ns"`
	P999  time.Duration `json:"p999_ns"`
	Max   time.Duration `json:"max_ns"`
	Mean  time.Duration `json:"mean_ns"`
}

// Summarize computes the distribution of samples (which it sorts).
func Summarize(samples []time.Duration) Summary {
	if len(samples) == 0 {
		return Summary{}
	}
	slices.Sort(samples)
	var sum time.Duration
	for _, s := range samples {
		sum += s
	}
	return Summary{
		Count: len(samples),
		P50:   Percentile(samples, 50),
		P90:   Percentile(samples, 90),
		P99:   Percentile(samples, 99),
		P999:  Percentile(samples, 99.9),
		Max:   samples[len(samples)-1],
		Mean:  sum / time.Duration(len(samples)),
	}
}

// Percentile returns the nearest-rank p-th percentile of sorted samples: the
// smallest sample with at least p% of samples at or below it.
func Percentile(sorted []time.Duration, p float64) time.Duration {
	if len(sorted) == 0 {
		return 0
	}
	// The epsilon keeps 99.9% of 1000 at rank 999 despite float rounding.
	rank := max(int(math.Ceil(p*float64(len(sorted))/100-1e-9)), 1)
	return sorted[min(rank, len(sorted))-1]
}

// Schedule returns the due times of an open-loop run: n requests at a fixed
// rate from start. Requests are due on this schedule whatever the replies,
// and latency is measured from the due time, so a stalled system cannot
// hide its stall by slowing the sender (no coordinated omission).
func Schedule(start time.Time, rate float64, d time.Duration) []time.Time {
	if rate <= 0 || d <= 0 {
		return nil
	}
	n := int(rate * d.Seconds())
	due := make([]time.Time, n)
	for i := range due {
		due[i] = start.Add(time.Duration(float64(i) / rate * float64(time.Second)))
	}
	return due
}
