//go:build !unix

package saga_test

import (
	"testing"
	"time"
)

// cpuTime is not read on this system: the benchmarks' cpu-µs/record is 0.
func cpuTime(*testing.B) time.Duration { return 0 }
