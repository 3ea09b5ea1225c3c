package app_test

import (
	"encoding/json"
	"net/http"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prozess/prozess/modules/deadletter"
	"github.com/prozess/prozess/schema/schematest"
)

// What PostgreSQL says when a record is refused (constraint, table and
// column names, SQLSTATE) is for admins: the order's owner sees a dead
// letter's code and participant, in GET /orders/{id} and in the audit
// trail's re-drive entry, and an admin the full reason. A bad deploy (a
// CHECK constraint no shipment meets) makes delivery dead-letter a real
// order, as in TestDeadLetterReplayReDrivesTheParticipantThatRejectedIt.
func TestOwnersSeeADeadLettersCodeAndAdminsItsReason(t *testing.T) {
	e := newEnv(t)
	r := e.start(e.config())
	c := loadContract(t, r.url)
	owner, admin := e.keyFor("u1"), e.keyFor("admin")
	schematest.Exec(t, e.pool, `ALTER TABLE shipments ADD CONSTRAINT bad_deploy CHECK (carrier <> 'prozess-post')`)
	id := r.order(t, "u1", "", mouse(1)).OrderID.String()
	deadline := time.Now().Add(30 * time.Second)
	for e.count(`SELECT count(*) FROM dead_letters WHERE order_id = $1`, id) == 0 {
		if time.Now().After(deadline) {
			t.Fatal("no dead letter for the order after 30s")
		}
		time.Sleep(50 * time.Millisecond)
	}
	// What must never reach an owner: all of it is in the reason.
	internals := []string{"bad_deploy", "shipments", "SQLSTATE", "23514", "violates"}

	type view struct {
		DeadLetters []map[string]any `json:"dead_letters"`
	}
	read := func(key string) (view, string) {
		t.Helper()
		b := c.check(t, r.url, call{name: "order with a dead letter", method: "GET", path: "/orders/" + id, key: key, status: 200})
		var v view
		if err := json.Unmarshal(b, &v); err != nil || len(v.DeadLetters) != 1 {
			t.Fatalf("dead letters %s (%v), want one", b, err)
		}
		return v, string(b)
	}
	v, raw := read(owner)
	d := v.DeadLetters[0]
	if d["code"] != deadletter.CodeConstraintViolation || d["participant"] != "delivery" {
		t.Fatalf("owner's dead letter %v, want code %s from delivery", d, deadletter.CodeConstraintViolation)
	}
	if _, ok := d["reason"]; ok {
		t.Errorf("owner sees the reason: %s", raw)
	}
	for _, s := range internals {
		if strings.Contains(raw, s) {
			t.Errorf("owner's view of the order mentions %q: %s", s, raw)
		}
	}
	v, raw = read(admin)
	d = v.DeadLetters[0]
	reason, _ := d["reason"].(string)
	if d["code"] != deadletter.CodeConstraintViolation || !strings.Contains(reason, "bad_deploy") || !strings.Contains(reason, "23514") {
		t.Fatalf("admin's dead letter %s, want the full reason and the code", raw)
	}

	// Re-driven by the admin: the trail's entry keeps the reason and who
	// did it for admins, and shows the owner the code only.
	schematest.Exec(t, e.pool, `ALTER TABLE shipments DROP CONSTRAINT bad_deploy`)
	dl := strconv.FormatInt(int64(d["id"].(float64)), 10)
	c.check(t, r.url, call{name: "re-drive", method: http.MethodPost, path: "/admin/dead-letters/" + dl + "/replay", key: admin, status: 200})
	r.await(t, id, 30*time.Second)
	trail := func(key string) (map[string]any, string, string) {
		t.Helper()
		b := c.check(t, r.url, call{name: "trail", method: "GET", path: "/orders/" + id + "/events", key: key, status: 200})
		var evs []struct {
			Type, Source string
			Data         map[string]any
		}
		if err := json.Unmarshal(b, &evs); err != nil {
			t.Fatal(err)
		}
		for _, ev := range evs {
			if ev.Type == deadletter.TrailType {
				return ev.Data, ev.Source, string(b)
			}
		}
		t.Fatalf("no %s entry in the trail: %s", deadletter.TrailType, b)
		return nil, "", ""
	}
	data, source, raw := trail(owner)
	if data["code"] != deadletter.CodeConstraintViolation || data["participant"] != "delivery" || source != "admin" {
		t.Errorf("owner's re-drive entry %v from %q, want the code, the participant, from admin", data, source)
	}
	if _, ok := data["replayed_by"]; ok {
		t.Errorf("owner sees who re-drove it: %v", data)
	}
	for _, s := range internals {
		if strings.Contains(raw, s) {
			t.Errorf("owner's trail mentions %q: %s", s, raw)
		}
	}
	data, source, _ = trail(admin)
	if reason, _ := data["reason"].(string); !strings.Contains(reason, "bad_deploy") || data["replayed_by"] != source || source == "admin" {
		t.Errorf("admin's re-drive entry %v from %q, want the reason and the admin key that did it", data, source)
	}
}
