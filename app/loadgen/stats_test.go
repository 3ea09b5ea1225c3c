package loadgen_test

import (
	"testing"
	"time"

	"github.com/prozess/prozess/app/loadgen"
)

func ms(n int) time.Duration { return time.Duration(n) * time.Millisecond }

func TestPercentileNearestRank(t *testing.T) {
	var s []time.Duration
	for i := 1; i <= 1000; i++ {
		s = append(s, ms(i))
	}
	for _, tc := range []struct {
		p    float64
		want time.Duration
	}{{50, ms(500)}, {90, ms(900)}, {99, ms(990)}, {99.9, ms(999)}, {100, ms(1000)}, {0, ms(1)}} {
		if got := loadgen.Percentile(s, tc.p); got != tc.want {
			t.Errorf("p%v = %v, want %v", tc.p, got, tc.want)
		}
	}
	if got := loadgen.Percentile([]time.Duration{ms(7)}, 99.9); got != ms(7) {
		t.Errorf("one sample: %v", got)
	}
	if got := loadgen.Percentile(nil, 50); got != 0 {
		t.Errorf("no samples: %v", got)
	}
}

func TestSummarizeSortsAndKeepsTheTail(t *testing.T) {
	// 999 fast samples and one stall: the stall must show at p99.9 and max.
	s := []time.Duration{ms(3000)}
	for range 999 {
		s = append(s, ms(2))
	}
	sum := loadgen.Summarize(s)
	if sum.Count != 1000 || sum.P50 != ms(2) || sum.P99 != ms(2) || sum.P999 != ms(2) || sum.Max != ms(3000) {
		t.Fatalf("%+v", sum)
	}
	s = append(s, ms(3000))
	if sum := loadgen.Summarize(s); sum.P999 != ms(3000) {
		t.Fatalf("two stalls in 1001 samples must reach p99.9: %+v", sum)
	}
}

func TestScheduleIsOpenLoop(t *testing.T) {
	start := time.Unix(100, 0)
	due := loadgen.Schedule(start, 200, 2*time.Second)
	if len(due) != 400 {
		t.Fatalf("%d requests for 200/s over 2s", len(due))
	}
	for i, d := range due {
		if want := start.Add(time.Duration(i) * 5 * time.Millisecond); d.Sub(want).Abs() > time.Microsecond {
			t.Fatalf("request %d due %v, want %v", i, d.Sub(start), want.Sub(start))
		}
	}
	if loadgen.Schedule(start, 0, time.Second) != nil {
		t.Fatal("rate 0 must schedule nothing")
	}
}
