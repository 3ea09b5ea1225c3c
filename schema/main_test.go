package schema_test

import (
	"os"
	"testing"

	"github.com/prozess/prozess/schema/schematest"
)

// TestMain gives the tests their servers (schematest.Main).
func TestMain(m *testing.M) { os.Exit(schematest.Main(m)) }
