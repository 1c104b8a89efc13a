package main

import (
	"fmt"
	"os"
	"time"

	"github.com/rs/zerolog"
	"github.com/urfave/cli/v2"
	"golang.org/x/term"
)

var log zerolog.Logger

// setupLogging sends logs to stderr: human-readable on a terminal, JSON
// lines otherwise (for services and log collectors).
func setupLogging(c *cli.Context) error {
	level, err := zerolog.ParseLevel(c.String("log-level"))
	if err != nil {
		return cli.Exit(fmt.Sprintf("bad --log-level %q: want debug, info, warn or error", c.String("log-level")), 2)
	}
	format := c.String("log-format")
	switch format {
	case "auto":
		format = "json"
		if term.IsTerminal(int(os.Stderr.Fd())) {
			format = "text"
		}
	case "text", "json":
	default:
		return cli.Exit(fmt.Sprintf("bad --log-format %q: want auto, text or json", format), 2)
	}
	if format == "text" {
		log = zerolog.New(zerolog.ConsoleWriter{Out: os.Stderr, TimeFormat: time.TimeOnly}).With().Timestamp().Logger()
	} else {
		log = zerolog.New(os.Stderr).With().Timestamp().Logger()
	}
	log = log.Level(level)
	return nil
}
