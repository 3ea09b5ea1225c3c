//go:build ignore

// tlsgen writes the certificates of the test cluster's SASL_SSL listener
// into DIR (app/testpki: ca.pem, keystore.pem, ...). Run from the
// repository: go run .ci/kafka/tlsgen.go DIR
package main

import (
	"fmt"
	"os"
	"time"

	"github.com/prozess/prozess/app/testpki"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: go run .ci/kafka/tlsgen.go DIR")
		os.Exit(2)
	}
	if _, err := testpki.Write(os.Args[1], 30*24*time.Hour); err != nil {
		fmt.Fprintln(os.Stderr, "tlsgen:", err)
		os.Exit(1)
	}
}
