package app_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"os"
	"strings"
	"testing"
	"time"
)

// A client that sends its request too slowly is cut off, so slow clients
// cannot hold connections.
func TestSlowClientIsCutOff(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.HTTPReadTimeout = time.Second
	r := e.start(cfg)
	addr := strings.TrimPrefix(r.url, "http://")
	for _, tc := range []struct{ name, send string }{
		{"headers never finish", "POST /orders HTTP/1.1\r\nHost: x\r\n"},
		{"body never finishes", "POST /orders HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + e.keyFor("u1") +
			"\r\nContent-Length: 100\r\n\r\n{\"items\":"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			conn, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if _, err := io.WriteString(conn, tc.send); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			conn.SetReadDeadline(time.Now().Add(10 * time.Second))
			// The server may answer (408 or 400) before closing; either way
			// the connection must end soon after the read timeout.
			_, err = io.Copy(io.Discard, bufio.NewReader(conn))
			if errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatal("the connection was still open after 10s")
			}
			if took := time.Since(start); took > 5*time.Second {
				t.Fatalf("cut off after %s, want about the 1s read timeout", took)
			}
		})
	}
	if n := e.count(`SELECT count(*) FROM orders`); n != 0 {
		t.Fatalf("%d orders from requests that never finished", n)
	}
}
