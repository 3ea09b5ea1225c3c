package app

import (
	"fmt"

	"github.com/spf13/cobra"

	"github.com/prozess/prozess/app/telemetry"
	"github.com/prozess/prozess/app/version"
)

// versionCommand is `prozess version`. It also gives root its --version
// flag, with the same text, so both name the build the same way.
func versionCommand(root *cobra.Command) *cobra.Command {
	v := version.Get()
	root.Version = v.String()
	root.SetVersionTemplate(versionText(v))
	return &cobra.Command{
		Use:   "version",
		Short: "Print the version, the commit and the Go version this binary was built from",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprint(cmd.OutOrStdout(), versionText(v))
			return err
		},
	}
}

func versionText(v version.Info) string {
	return fmt.Sprintf("prozess %s\ncommit  %s\ngo      %s\n", v.Version, v.CommitLabel(), v.GoVersion)
}

// newMetrics is a process's metrics with prozess_build_info set, so every
// scrape names the build that answered it.
func newMetrics() *telemetry.Metrics {
	m := telemetry.NewMetrics()
	v := version.Get()
	m.RegisterBuildInfo(v.Version, v.CommitLabel(), v.GoVersion)
	return m
}
