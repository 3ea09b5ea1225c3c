// Command prozess runs the order saga; see `prozess --help`.
package main

import (
	"os"

	"github.com/prozess/prozess/app"
)

func main() { os.Exit(app.Main(os.Args[1:])) }
