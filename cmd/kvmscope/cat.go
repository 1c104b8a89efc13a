package main

import (
	"context"
	"fmt"
	"net/url"
	"os"
	"strconv"

	"github.com/kvmscope/kvmscope/introspect"
	"github.com/urfave/cli/v2"
)

// catCommand prints the first bytes of a guest file from the guest
// kernel's page cache.
func catCommand() *cli.Command {
	return &cli.Command{
		Name:      "cat",
		Usage:     "print a guest file's first bytes, read from the guest kernel's page cache (cached pages only)",
		ArgsUsage: " ",
		Description: "The path is walked through the guest kernel's dentry cache from init's root,\n" +
			"and the file's pages are found in its inode's page cache: read-only, nothing in the\n" +
			"guest is asked. A page the guest has not cached ends the output, and is named on\n" +
			"stderr. Mount points are not crossed. See docs/writable.md.",
		Flags: []cli.Flag{apiFlag, vmFlag, coreFlag, jsonFlag,
			&cli.StringFlag{Name: "path", Usage: "the guest file, an absolute path", Required: true},
			&cli.IntFlag{Name: "bytes", Value: 4096, Usage: "at most this many bytes (up to 1 MiB)"},
		},
		Action: guestAction(func(c *cli.Context, g guest, ctx context.Context) error {
			var f *introspect.CachedFile
			var err error
			if cg, ok := g.(*coreGuest); ok {
				f, err = cg.sess.ReadCachedFile(ctx, c.String("path"), c.Int("bytes"))
			} else {
				f = &introspect.CachedFile{}
				q := url.Values{"path": {c.String("path")}, "bytes": {strconv.Itoa(c.Int("bytes"))}}
				err = g.(*liveGuest).c.Get(ctx, "/v1/files?"+q.Encode(), f)
			}
			if err != nil {
				return err
			}
			if c.Bool("json") {
				if err := printJSON(f); err != nil {
					return err
				}
			} else {
				os.Stdout.Write(f.Data)
			}
			if f.Uncached != nil {
				return cli.Exit(fmt.Sprintf("%s: page %d (from byte %d of %d) is not in the guest's page cache", f.Path, *f.Uncached, *f.Uncached*4096, f.Size), 1)
			}
			return nil
		}),
	}
}
