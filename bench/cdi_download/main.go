// Command cdi-download is bench/import.py's stand-in for the download step of KubeVirt CDI's
// importer when it uses scratch space: GET the image with Go's net/http client, peel off gzip
// and xz layers with compress/gzip and github.com/ulikunitz/xz (the decoders CDI's format
// readers use), and io.Copy the result into the scratch file. The benchmark then runs
// `qemu-img convert` on that file, as CDI does. It is our own code, written for the benchmark.
//
// Usage: cdi-download URL OUTFILE
package main

import (
	"bufio"
	"bytes"
	"compress/gzip"
	"fmt"
	"io"
	"net/http"
	"os"

	"github.com/ulikunitz/xz"
)

var (
	gzipMagic = []byte{0x1f, 0x8b}
	xzMagic   = []byte{0xfd, '7', 'z', 'X', 'Z', 0x00}
)

func main() {
	if len(os.Args) != 3 {
		fmt.Fprintln(os.Stderr, "usage: cdi-download URL OUTFILE")
		os.Exit(2)
	}
	if err := download(os.Args[1], os.Args[2]); err != nil {
		fmt.Fprintln(os.Stderr, "cdi-download:", err)
		os.Exit(1)
	}
}

func download(url, outfile string) error {
	resp, err := http.Get(url)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode < 200 || resp.StatusCode > 299 {
		return fmt.Errorf("GET %s: %s", url, resp.Status)
	}
	stream, err := decompress(resp.Body)
	if err != nil {
		return err
	}
	out, err := os.OpenFile(outfile, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o644)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, stream); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// decompress looks at the first bytes and wraps the stream in a decoder for as long as they
// are a gzip or xz magic number, so a .xz inside a .gz is handled too; anything else
// (qcow2, raw) is passed through unchanged.
func decompress(r io.Reader) (io.Reader, error) {
	for {
		buffered := bufio.NewReader(r)
		head, err := buffered.Peek(len(xzMagic))
		if err != nil && err != io.EOF {
			return nil, err
		}
		switch {
		case bytes.HasPrefix(head, gzipMagic):
			if r, err = gzip.NewReader(buffered); err != nil {
				return nil, err
			}
		case bytes.HasPrefix(head, xzMagic):
			if r, err = xz.NewReader(buffered); err != nil {
				return nil, err
			}
		default:
			return buffered, nil
		}
	}
}
