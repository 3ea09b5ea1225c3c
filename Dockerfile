# One image for every participant: `prozess serve <participant>`.
FROM golang:1.26 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
RUN CGO_ENABLED=0 go build -trimpath -o /prozess .

FROM gcr.io/distroless/static-debian12
COPY --from=build /prozess /prozess
USER nonroot
ENTRYPOINT ["/prozess"]
