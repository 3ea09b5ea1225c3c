# One image for every participant: `prozess serve <participant>`.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
# The build's identity for `prozess version` and prozess_build_info (.git is
# not in the context, so the toolchain cannot record it):
#   docker build --build-arg VERSION=$(git describe --tags --always) --build-arg COMMIT=$(git rev-parse HEAD) .
ARG VERSION=devel
ARG COMMIT=unknown
RUN CGO_ENABLED=0 go build -trimpath \
      -ldflags "-X github.com/prozess/prozess/app/version.Version=${VERSION} -X github.com/prozess/prozess/app/version.Commit=${COMMIT}" \
      -o /prozess .

FROM gcr.io/distroless/static-debian12
COPY --from=build /prozess /prozess
USER nonroot
ENTRYPOINT ["/prozess"]
