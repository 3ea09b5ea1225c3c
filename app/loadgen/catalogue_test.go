package loadgen_test

import (
	"slices"
	"testing"

	"github.com/prozess/prozess/app/loadgen"
	"github.com/prozess/prozess/modules/event"
)

// TestCatalogueOrdersAreValidAndSkewed draws 20,000 orders from the default
// catalogue (1,000 products, up to 3 lines, s = 1.1) and checks that each is
// an order the API accepts (valid lines, no product twice, products of the
// catalogue) and that popularity is skewed as a shop's is: the 100 most
// popular products sell most units, the least popular half few, and the
// most popular one far more than the median one. A uniform draw fails it.
func TestCatalogueOrdersAreValidAndSkewed(t *testing.T) {
	c, err := loadgen.NewCatalogue(1000, 3, 1.1, 1)
	if err != nil {
		t.Fatal(err)
	}
	rank := map[string]int{}
	for i, id := range c.Products() {
		rank[id] = i
	}
	sold := make([]int, len(c.Products()))
	total, lines := 0, map[int]int{}
	for range 20000 {
		items := c.Order()
		if err := event.ValidateItems(items); err != nil {
			t.Fatalf("invalid order %v: %v", items, err)
		}
		lines[len(items)]++
		seen := map[string]bool{}
		for _, it := range items {
			k, ok := rank[it.ProductID]
			if !ok || seen[it.ProductID] {
				t.Fatalf("order %v: %s is not in the catalogue, or listed twice", items, it.ProductID)
			}
			seen[it.ProductID] = true
			sold[k] += it.Qty
			total += it.Qty
		}
	}
	if len(lines) != 3 || lines[1] < 5000 || lines[3] < 5000 {
		t.Errorf("lines per order %v: want 1, 2 and 3 about equally often", lines)
	}
	share := func(from, to int) float64 {
		n := 0
		for _, s := range sold[from:to] {
			n += s
		}
		return float64(n) / float64(total)
	}
	top, bottom := share(0, 100), share(500, 1000)
	if top < 0.5 || bottom > 0.15 {
		t.Errorf("the 100 most popular products sold %.0f%% of units, the least popular 500 %.0f%%: not skewed (want >= 50%% and <= 15%%)", 100*top, 100*bottom)
	}
	if median := slices.Sorted(slices.Values(sold))[500]; sold[0] < 20*max(median, 1) {
		t.Errorf("the most popular product sold %d units, the median one %d: not skewed", sold[0], median)
	}
	t.Logf("units: top 100 products %.0f%%, bottom 500 %.0f%%, most popular %d, lines per order %v", 100*top, 100*bottom, sold[0], lines)
}

// TestCatalogueFlagsChecked: a catalogue the flags cannot describe is
// refused with the flag named.
func TestCatalogueFlagsChecked(t *testing.T) {
	for _, tc := range []struct {
		n, lines int
		s        float64
	}{{1, 1, 1.1}, {10, 0, 1.1}, {10, 11, 1.1}, {1000, 101, 1.1}, {10, 3, 1}, {10, 3, 0.5}} {
		if _, err := loadgen.NewCatalogue(tc.n, tc.lines, tc.s, 1); err == nil {
			t.Errorf("NewCatalogue(%d, %d, %g) accepted", tc.n, tc.lines, tc.s)
		}
	}
}
