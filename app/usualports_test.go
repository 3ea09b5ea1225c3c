package app_test

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/prozess/prozess/seed"
)

// holdUsualPorts makes sure something else listens on the ports a
// developer's own PostgreSQL, Redis and Kafka usually take: where nothing
// does (a clean machine), the test listens there itself for its duration.
// It returns the addresses it could not take because they were in use.
func holdUsualPorts(t *testing.T, addrs ...string) {
	t.Helper()
	for _, a := range addrs {
		ln, err := net.Listen("tcp", a)
		if err != nil {
			continue // the machine's own server, which is the point
		}
		t.Cleanup(func() { ln.Close() })
		go func() { // accept and hang up, as a server that is not ours
			for {
				c, err := ln.Accept()
				if err != nil {
					return
				}
				c.Close()
			}
		}()
	}
}

// cleanEnv is the environment without any PROZESS_ variable, so a command
// runs with its defaults alone, as a newcomer's would.
func cleanEnv() []string {
	var env []string
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "PROZESS_") {
			env = append(env, kv)
		}
	}
	return env
}

// prozessIn runs the binary in dir with args and no PROZESS_ variables,
// within a minute.
func prozessIn(t *testing.T, dir string, args ...string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, binary, args...)
	cmd.Dir, cmd.Env = dir, cleanEnv()
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// With PostgreSQL, Redis and Kafka ports of the machine's own taken, `serve
// all` with no server flags moves its embedded servers to free ports, and
// every command run beside it with no flags (orders get, orders tail, check,
// dlq list, apikey create) finds them through the data directory's record,
// never the machine's servers; once it stops they say so instead of
// reaching anything else.
func TestCommandsFindServeAllBesideMachineServers(t *testing.T) {
	holdUsualPorts(t, "127.0.0.1:5432", "127.0.0.1:6379", "127.0.0.1:9092")
	dir := reachableTempDir(t)
	httpAddr := freeAddr(t)
	serve := exec.Command(binary, "serve", "all", "--http-addr", httpAddr, "--admin-addr", freeAddr(t))
	serve.Dir, serve.Env = dir, cleanEnv()
	var logs syncBuffer
	serve.Stdout, serve.Stderr = &logs, &logs
	if err := serve.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- serve.Wait() }()
	stopped := false
	stop := func() { // Ctrl-C, as a user stops it
		if stopped {
			return
		}
		stopped = true
		_ = serve.Process.Signal(os.Interrupt)
		select {
		case err := <-exited:
			if err != nil {
				t.Errorf("serve all did not stop cleanly on Ctrl-C: %v\n%s", err, logs.String())
			}
		case <-time.After(30 * time.Second):
			_ = serve.Process.Kill()
			t.Errorf("serve all did not stop within 30s of Ctrl-C:\n%s", logs.String())
		}
	}
	t.Cleanup(stop)
	base := "http://" + httpAddr
	deadline := time.Now().Add(90 * time.Second)
	for {
		res, err := http.Get(base + "/products")
		if err == nil {
			res.Body.Close()
			if res.StatusCode == 200 {
				break
			}
		}
		select {
		case err := <-exited:
			t.Fatalf("serve all exited at start: %v\n%s", err, logs.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("serve all not ready in 90s:\n%s", logs.String())
		}
		time.Sleep(100 * time.Millisecond)
	}

	var rec struct {
		DatabaseURL  string   `json:"database_url"`
		RedisAddr    string   `json:"redis_addr"`
		KafkaBrokers []string `json:"kafka_brokers"`
	}
	b, err := os.ReadFile(filepath.Join(dir, ".prozess", "servers.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &rec); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(rec.DatabaseURL, ":5432/") || rec.RedisAddr == "127.0.0.1:6379" || len(rec.KafkaBrokers) != 1 || rec.KafkaBrokers[0] == "127.0.0.1:9092" {
		t.Fatalf("the embedded servers did not move off the taken usual ports: %s", b)
	}

	req, _ := http.NewRequest("POST", base+"/orders", strings.NewReader(`{"items":[{"product_id":"prod-mouse","qty":1}]}`))
	req.Header.Set("Authorization", "Bearer "+seed.DemoKey)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	var created struct {
		OrderID string `json:"order_id"`
	}
	if res.StatusCode != 201 || json.Unmarshal(body, &created) != nil || created.OrderID == "" {
		t.Fatalf("POST /orders: %d %s", res.StatusCode, body)
	}
	status := ""
	for end := time.Now().Add(30 * time.Second); status != "SHIPPED" && status != "CANCELLED"; {
		if time.Now().After(end) {
			t.Fatalf("order %s still %q after 30s", created.OrderID, status)
		}
		time.Sleep(100 * time.Millisecond)
		out, err := prozessIn(t, dir, "orders", "get", created.OrderID, "--json")
		if err != nil {
			t.Fatalf("orders get with no flags: %v\n%s", err, out)
		}
		var o struct{ Status string }
		if err := json.Unmarshal([]byte(out), &o); err != nil {
			t.Fatalf("orders get --json: %v\n%s", err, out)
		}
		status = o.Status
	}

	if out, err := prozessIn(t, dir, "check", "--deadline", "1m"); err != nil || strings.Contains(out, "FAIL") || !strings.Contains(out, "1 orders (1 terminal") {
		t.Errorf("check with no flags: %v\n%s", err, out)
	}
	if out, err := prozessIn(t, dir, "dlq", "list"); err != nil || !strings.Contains(out, "0 dead letters") {
		t.Errorf("dlq list with no flags: %v\n%s", err, out)
	}
	if out, err := prozessIn(t, dir, "apikey", "create", "--user", "ops"); err != nil || !strings.Contains(out, "created API key") {
		t.Errorf("apikey create with no flags: %v\n%s", err, out)
	}
	tailOut := tailUntil(t, dir, created.OrderID)
	if !strings.Contains(tailOut, "OrderCreated") {
		t.Errorf("orders tail with no flags printed no OrderCreated of %s:\n%s", created.OrderID, tailOut)
	}

	stop()
	if _, err := os.Stat(filepath.Join(dir, ".prozess", "servers.json")); !os.IsNotExist(err) {
		t.Errorf("the record outlived serve all: %v", err)
	}
	for _, args := range [][]string{{"orders", "get", created.OrderID}, {"orders", "tail"}, {"check"}} {
		out, err := prozessIn(t, dir, args...)
		if err == nil || !strings.Contains(out, "no prozess serve all, dev or broker is running") {
			t.Errorf("%v with nothing running: %v\n%s", args, err, out)
		}
	}
}

// tailUntil runs `orders tail --from-start` with no flags until it prints
// the order's first event, then stops it as Ctrl-C would.
func tailUntil(t *testing.T, dir, order string) string {
	t.Helper()
	cmd := exec.Command(binary, "orders", "tail", "--from-start", "--order", order)
	cmd.Dir, cmd.Env = dir, cleanEnv()
	var out syncBuffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	end := time.After(30 * time.Second)
	for {
		select {
		case err := <-done:
			return fmt.Sprintf("(exited: %v)\n%s", err, out.String())
		case <-end:
			_ = cmd.Process.Signal(syscall.SIGINT)
			<-done
			return out.String()
		case <-time.After(100 * time.Millisecond):
			if strings.Contains(out.String(), "OrderCreated") {
				_ = cmd.Process.Signal(syscall.SIGINT)
				<-done
				return out.String()
			}
		}
	}
}
