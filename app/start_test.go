package app_test

import (
	"context"
	"io"
	"log/slog"
	"strings"
	"testing"

	"github.com/prozess/prozess/app"
)

// A dependency that cannot be reached at start fails it with one line that
// names the dependency and where it was looked for.
func TestStartNamesTheUnreachableDependency(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		name   string
		mangle func(c *app.Config)
		want   string
	}{
		{"postgres", func(c *app.Config) { c.DatabaseURL = "postgres://postgres@127.0.0.1:1/prozess" }, "cannot reach PostgreSQL at 127.0.0.1:1"},
		{"redis", func(c *app.Config) { c.RedisAddr = "127.0.0.1:1" }, "cannot reach Redis at 127.0.0.1:1"},
		{"kafka", func(c *app.Config) { c.KafkaBrokers = []string{"127.0.0.1:1"} }, "cannot reach Kafka at [127.0.0.1:1]"},
		{"decline rate", func(c *app.Config) { c.PaymentDeclineRate = 2 }, "--payment-decline-rate"},
		{"partitions", func(c *app.Config) { c.Partitions = 0 }, "--partitions"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := e.config()
			tc.mangle(&cfg)
			_, err := app.NewSystem(context.Background(), cfg, app.Participants(), slog.New(slog.NewTextHandler(io.Discard, nil)))
			if err == nil || !strings.Contains(err.Error(), tc.want) || strings.Contains(err.Error(), "\n") {
				t.Fatalf("error %v, want one line containing %q", err, tc.want)
			}
		})
	}
}

func TestParseParticipants(t *testing.T) {
	for _, tc := range []struct {
		args []string
		want string
		err  string
	}{
		{[]string{"all"}, "api inventory payment delivery status", ""},
		{[]string{"payment"}, "payment", ""},
		{[]string{"inventory", "payment", "inventory"}, "inventory payment", ""},
		{nil, "", "name at least one participant"},
		{[]string{"shipping"}, "", `unknown participant "shipping"`},
	} {
		got, err := app.ParseParticipants(tc.args)
		if tc.err != "" {
			if err == nil || !strings.Contains(err.Error(), tc.err) {
				t.Errorf("%v: error %v, want %q", tc.args, err, tc.err)
			}
			continue
		}
		if err != nil || strings.Join(got, " ") != tc.want {
			t.Errorf("%v: %v %v, want %s", tc.args, got, err, tc.want)
		}
	}
}

// Bad flags and environment variables are refused with their name.
func TestCommandLineErrorsNameTheFlag(t *testing.T) {
	for _, tc := range []struct {
		args []string
		env  map[string]string
		want string
	}{
		{[]string{"serve", "all", "--payment-decline-rate", "x"}, nil, "--payment-decline-rate"},
		{[]string{"serve", "all"}, map[string]string{"PROZESS_PARTITIONS": "many"}, "PROZESS_PARTITIONS"},
		{[]string{"serve", "all", "--log-level", "loud"}, nil, "--log-level"},
		{[]string{"serve", "nobody"}, nil, "unknown participant"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			for k, v := range tc.env {
				t.Setenv(k, v)
			}
			cmd := app.NewRootCommand()
			cmd.SetArgs(tc.args)
			cmd.SetOut(io.Discard)
			cmd.SetErr(io.Discard)
			if err := cmd.Execute(); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %v, want one naming %s", err, tc.want)
			}
		})
	}
}

// The public demo key only ever works for an api on loopback: beyond it,
// serve neither creates the key nor offers it, and refuses to start while
// it is active in the database, unless --demo says this is a demo.
func TestDemoKeyOnlyOnLoopback(t *testing.T) {
	e := newEnv(t)
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	demoKeys := func() int64 {
		return e.count(`SELECT count(*) FROM api_keys WHERE id = 'kdemo' AND revoked_at IS NULL`)
	}

	public := e.config()
	public.KafkaBrokers = e.broker()
	public.HTTPAddr = "0.0.0.0:0"
	r := e.start(public, "api")
	if n := demoKeys(); n != 0 {
		t.Fatalf("serve beyond loopback created the demo key (%d)", n)
	}
	if code, _ := r.post(t, "/admin/dead-letters/1/replay", "pz_kdemo_0000000000000000000000000000000000000000000000000000000000000000"); code != 401 {
		t.Fatalf("the demo key beyond loopback: %d, want 401", code)
	}
	r.shutdown(t)

	loopback := public
	loopback.HTTPAddr = "127.0.0.1:0"
	e.start(loopback, "api").shutdown(t) // the quick start, on loopback, creates it
	if n := demoKeys(); n != 1 {
		t.Fatalf("serve on loopback did not create the demo key (%d)", n)
	}
	_, err := app.NewSystem(context.Background(), public, []string{"api"}, quiet)
	if err == nil || !strings.Contains(err.Error(), "demo API key") || !strings.Contains(err.Error(), "prozess apikey revoke kdemo") {
		t.Fatalf("serve beyond loopback with the demo key active: %v, want a refusal naming the revoke", err)
	}
	demo := public
	demo.Demo = true
	e.start(demo, "api").shutdown(t)
}
