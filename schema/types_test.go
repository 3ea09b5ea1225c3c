package schema_test

import (
	"testing"

	"github.com/google/uuid"
	"github.com/jackc/pgx/v5/pgtype"

	"github.com/prozess/prozess/schema"
	"github.com/prozess/prozess/schema/schematest"
)

// TestUUIDsTravelExactly sends ids through a pool as the binary's are
// configured (schema.ConfigurePool, via schematest.NewPool) and checks that
// PostgreSQL reads the same ids pgx's own text path would give it (its text
// form equals uuid.UUID's), singly, in arrays, and back.
func TestUUIDsTravelExactly(t *testing.T) {
	pool := schematest.NewPool(t)
	ctx := t.Context()
	ids := []uuid.UUID{uuid.New(), uuid.Must(uuid.NewV7()), uuid.Nil, uuid.MustParse("ffffffff-0000-4000-8000-0123456789ab")}

	for _, id := range ids {
		var text string
		var back uuid.UUID
		if err := pool.QueryRow(ctx, `SELECT $1::uuid::text, $1::uuid`, id).Scan(&text, &back); err != nil {
			t.Fatal(err)
		}
		if text != id.String() || back != id {
			t.Errorf("sent %s: PostgreSQL read %s, scanned back %s", id, text, back)
		}
	}

	var texts []string
	var back []uuid.UUID
	if err := pool.QueryRow(ctx, `SELECT array_agg(u::text ORDER BY n), array_agg(u ORDER BY n)
		FROM unnest($1::uuid[]) WITH ORDINALITY AS x(u, n)`, ids).Scan(&texts, &back); err != nil {
		t.Fatal(err)
	}
	for i, id := range ids {
		if texts[i] != id.String() || back[i] != id {
			t.Errorf("array element %d: sent %s, PostgreSQL read %s, scanned back %s", i, id, texts[i], back[i])
		}
	}

	// NULL leaves the target as it is, as uuid.UUID's own Scan does.
	kept := ids[0]
	if err := pool.QueryRow(ctx, `SELECT NULL::uuid`).Scan(&kept); err != nil || kept != ids[0] {
		t.Errorf("NULL scanned into a uuid.UUID: %s, %v; want it left as %s", kept, err, ids[0])
	}
}

// BenchmarkUUIDArrayEncode encodes the 500 ids of a full consumer batch's
// inbox claim as a uuid[] parameter, with pgx's own handling of uuid.UUID
// (a driver.Valuer: text, through reflection) and with schema's binary
// codec, in the same run.
func BenchmarkUUIDArrayEncode(b *testing.B) {
	ids := make([]uuid.UUID, 500)
	for i := range ids {
		ids[i] = uuid.Must(uuid.NewV7())
	}
	for _, c := range []struct {
		name     string
		register bool
	}{{"pgx", false}, {"binary", true}} {
		b.Run(c.name, func(b *testing.B) {
			m := pgtype.NewMap()
			if c.register {
				schema.RegisterTypes(m)
			}
			var buf []byte
			b.ReportAllocs()
			for b.Loop() {
				var err error
				if buf, err = m.Encode(pgtype.UUIDArrayOID, pgtype.BinaryFormatCode, ids, buf[:0]); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
